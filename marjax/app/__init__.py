"""Floor 5, the application: the stage runner (run config, data factory), the one stage recipe
that the pipeline and the experiments share, the pipeline, its reports, and the commands."""
