"""Sample quality: an MNIST classifier, Frechet distance and class accuracy."""
