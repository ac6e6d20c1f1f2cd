"""`abq gateway`: an OpenAI-compatible front door over abqueue's queues."""
