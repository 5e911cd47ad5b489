"""The pure core: admission, queue order, deadlines, machine selection. No I/O."""
