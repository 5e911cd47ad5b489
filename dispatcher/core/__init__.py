"""The pure core: admission, queue order, deadlines, machine selection, placement planning and
request decoding. Facts in, a decision out; no I/O."""
