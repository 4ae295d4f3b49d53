"""scalr stages: what runs. One module per stage, each with one entry function taking a typed config."""
