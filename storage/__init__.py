"""Where results live: identity (keys), result cache, job store, object store."""
