"""Node implementations (torch). Each function takes a NodeContext and the node's inputs."""
