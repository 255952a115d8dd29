"""Stage 1: dataset -> packed teacher sequences -> teacher forward -> cache."""
