"""The shipped recipes, one `get_config()` file each, chosen by name: `--config cats_vs_dogs`."""
