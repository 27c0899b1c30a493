"""Activation profiling: which residual-stream dimensions a persona moves, per layer.

    stats     streaming moments (Welford/Chan) and an incremental-SVD sketch for the first component
    profile   the `profile` stage: answers, response-token hooks, z-scores, push/pull sets, vectors
    report    profile.safetensors, summary.json, heatmap.png (own PNG encoder), the terminal table

The file format and the residual-stream hooks shared with push/pull and steering live in
`character_baker.backends.steering`.
"""
