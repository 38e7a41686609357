"""graphopt's built-in backends, one module each; registered through entry points."""
