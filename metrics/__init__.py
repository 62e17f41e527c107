"""FID and KID: the standard Inception detector, features of datasets and of samples, and the metrics."""
