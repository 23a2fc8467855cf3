"""UP2You's multi-view diffusion: SD 2.1-base + T2I pose adapter + decoupled multi-view row attention and
reference attention, with the memory levers a budgeted run needs (shared-key row attention, attn1-only
reference cache, chunked reference pass, sequential CFG, THG, sliced/tiled VAE, offload)."""
