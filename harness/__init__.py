"""What experiment scripts share: statistics for comparing policies (more to move here)."""
