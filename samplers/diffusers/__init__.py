"""diffusers integration: drop-in LML schedulers and the posterior-sampling pipeline."""
