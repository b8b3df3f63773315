//! The connector implementations, one folder per CRM, and the registry that builds them.
