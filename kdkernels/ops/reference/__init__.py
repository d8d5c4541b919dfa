"""Plain-PyTorch reference implementations: the readable spec every fast backend is tested
against (in float64), and the ``torch`` backend, the last fallback."""
