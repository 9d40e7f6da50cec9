"""The one code path every protocol uses to accept an instance."""
