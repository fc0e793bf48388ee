"""The ``reward_model`` stage: a Bradley-Terry reward model trained in the DAG (``stage.py`` holds ``run``)."""
