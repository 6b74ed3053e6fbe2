"""qstar_jax: Quiet-STaR in JAX, from a Hugging Face checkpoint to a TPU pod and back.

Array names end in shape letters (x_BLD is [batch, positions, model width]). Each letter means
one thing across the package, and every module's legend uses it so:

    A  answer choices of a question (evaluation)
    B  batch: sequences, or examples
    C  chain-buffer slots of each position, one per chain pass
    D  model width
    E  head width
    F  feed-forward width
    G  query heads per key/value head, H // K
    H  query heads
    I  chain passes, the base pass counted as 0 (the chain buffer's read table)
    J  rewarded positions
    K  key/value heads
    L  positions: the new tokens of a call
    M  sampled thought tokens, one think pass each (n_ahead - 3)
    N  layers
    P  rationales per position (the config key n_passes)
    Q  the rationales of a position the policy gradient is computed on (policy_rows)
    R  rows: the P rationales of B sequences side by side, P * B
    S  prefix keys, shared by every new token of a call (the base pass's, or the decode cache)
    T  talk offsets, one talk pass each (n_ahead_talk)
    U  micro-batches of one update
    V  vocabulary
    W  batches of a held-out set
    X  entries of one block (keys in attention, tokens in sampling)
    Z  blocks

Passes: the base pass runs the decoder over the sequence; a chain pass runs it once more at
every position at once, on that position's chain (thought or talk) of earlier chain passes.
Think passes are the chain passes that draw a thought's tokens, talk passes the ones after
it that score the true next tokens.
"""
