"""What dnc tells a person about an IR: summary, training memory, diff, pictures, the IR as text, tables."""
