"""Machine workers: each serves one machine, runs the flows handed to it, and reports back."""
