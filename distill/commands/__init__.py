"""The `distill` command: its entry point, the recipe CLI, the pipeline and the predict/export/attention commands."""
