"""What train.py uses besides its loop: the step (and its CUDA graph), the run's state and its
checkpoints (resume, --init), the logging sinks."""
