"""The command-line client of the library: flags, the run plan, the run itself, quiet TensorFlow start-up."""
