"""Run I/O shared by every command: the config (`config`: sections and loading; `validate`, `presets`,
`reference_yaml` for the authors' flat YAML), the run folder's files (`folder`), the checkpoint
layout (`checkpoint`), building a run's model from its config (`build`), opening a trained run
(`load.load_run`) and the pipeline folder's config.json and model card (`model_card`)."""
