"""The reported test evaluation: AutoAttack as published, PGD with restarts, and the gradient-masking checks."""
