"""Run I/O shared by every command: the config and its presets (`config`), the checkpoint layout
(`checkpoint`), building a run's model from its config (`build`) and opening a trained run
(`load.load_run`)."""
