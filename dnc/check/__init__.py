"""`dnc verify`: run what the targets emit against the references (torchvision, the interpreter). Imports torch."""
