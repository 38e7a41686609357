"""graphopt's built-in passes, one module each; registered through entry points."""
