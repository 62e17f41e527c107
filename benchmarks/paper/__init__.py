"""The paper in miniature: Table 2 (configs A-F), Figure 2 (FID against NFE per sampler improvement) and the
stochastic sampler's S_churn curve (Section 4), on the embedded Fashion-MNIST; ``python -m benchmarks.paper``.
See docs/paper-miniature.md."""
