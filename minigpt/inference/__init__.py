"""Inference: sampling, the decoding loop, decode-time weights, the serving engine, chat, the server."""
