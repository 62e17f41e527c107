"""EDM2's power-function EMA (Karras et al. 2024, Section 3): the profiles and their least-squares combination, and
the EMAs tracked during training (``phema``); post-hoc reconstruction from saved snapshots (``reconstruct``); and
the sweep of FID against sigma_rel that chooses the EMA length after training (``sweep``)."""
