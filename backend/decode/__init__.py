"""Decoding: one batched interface (protocol), the eager and fast decoders, and the batching thread."""
