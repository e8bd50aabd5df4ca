"""pacs-receiver."""
