"""The benchmark scripts' tests: they run the scripts as a user would, as subprocesses."""
