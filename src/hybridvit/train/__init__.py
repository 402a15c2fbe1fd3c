"""Training, evaluation and prediction (needs the `train` extra). Entry point: `train(TrainConfig)`."""
