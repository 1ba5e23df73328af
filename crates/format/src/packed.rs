//! The packed neuron-cluster model format (version 1). In progress.
