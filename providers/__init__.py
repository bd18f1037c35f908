"""Provider adapters: one folder each, all behind ``providers.base.Provider``."""
