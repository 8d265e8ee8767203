"""What test files share: servers of their own, the shared Redis db a run claims, and the
check that the shared servers were left alone."""
