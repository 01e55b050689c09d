"""Converting the paper's released checkpoints (see `convert_original`); `import clipcap_hf` does not import it."""
