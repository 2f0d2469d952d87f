"""GPU kernels (Triton) with pure-torch references; leaf code that imports no other layer."""
