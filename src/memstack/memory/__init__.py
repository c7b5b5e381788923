"""The memory layers, one file each: window (1), compressive (2), keys and store (3), sleep (4)."""
