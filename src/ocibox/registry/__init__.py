"""The distribution-spec registry client: transport, authentication, credentials.

Transport only: it knows nothing of the store (ocibox.transfer joins the two).
"""
