"""Small, fully inspectable experiments built on the package (the paper's tabular tree MDP)."""
