"""One module per `mode`: each exposes `run(cfg, workdir)`; run.py picks it by the config's mode."""
