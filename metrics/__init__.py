"""FID, KID and FD-DINOv2: the standard Inception detector, EDM2's DINOv2 detector, features of datasets and of
samples, reference statistics, and the metrics."""
