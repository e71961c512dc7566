"""The Mistral-7B-v0.1 shape (its config.json values), shared by the benchmarks that build random-weight models."""

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, rope_theta=10000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-5)
