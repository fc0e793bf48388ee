"""The model-side core shared by the stages: chat rendering, model loading, log-probs, attention, losses."""
