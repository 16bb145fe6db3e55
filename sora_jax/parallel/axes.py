"""Logical axis names: the only sharding vocabulary model code uses.

Every parameter is created with a tuple of these names (one per dimension) and
every activation constrained at a block boundary names its dimensions with them.
Which mesh axis (if any) a logical axis maps to is decided by the rules in the
config (`config.sharding.rules`), never by model code.
"""

# Activations.
BATCH = "batch"            # examples in a batch
LENGTH = "length"          # spacetime tokens of a video
TEXT_LENGTH = "text_length"  # text tokens
ACT_EMBED = "act_embed"    # model width of activations
ACT_HEADS = "act_heads"    # attention heads of activations

# Parameters.
EMBED = "embed"            # model width
HEADS = "heads"            # attention heads x head_dim, fused
MLP = "mlp"                # MLP hidden width
VOCAB = "vocab"            # text vocabulary
PATCH = "patch"            # flattened spacetime patch (pt * ph * pw * C)
TEXT_EMBED = "text_embed"  # text encoder width
MODULATION = "modulation"  # adaLN chunks (shift/scale/gate)
NORM = "norm"              # norm scales and other small vectors
RELPOS = "relpos"          # relative-position buckets of the text encoder
LAYERS = "layers"          # stacked blocks (model.scan_layers)
CONV_IN = "conv_in"        # input channels of a convolution kernel (the VAE)
CONV_OUT = "conv_out"      # output channels of a convolution kernel and its bias

# Mesh axes (the names the config's mesh may use).
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
