################################################################################
#
# cloudlet
#
################################################################################

# The workspace this external tree lives in.
CLOUDLET_VERSION = 0.1.0
CLOUDLET_SITE = $(BR2_EXTERNAL_CLOUDLET_PATH)/..
CLOUDLET_SITE_METHOD = local
CLOUDLET_LICENSE = Apache-2.0
CLOUDLET_LICENSE_FILES = LICENSE
# The cargo infrastructure appends its note on vendored licences to each
# variant's licence: the host's own keeps it from being appended twice.
# (The crates and their licences are the cloudlet-crates package.)
HOST_CLOUDLET_LICENSE = Apache-2.0

# host-cloudlet: the cloudlet-bundle tool that post-image signs bundles with.
CLOUDLET_DEPENDENCIES = cloudlet-crates host-cloudlet \
	$(if $(BR2_PACKAGE_BUSYBOX),busybox)
HOST_CLOUDLET_DEPENDENCIES = host-cloudlet-crates

# Build output is not source: keep it out of the build directory and out of
# legal-info's archive of the sources.
CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /target --exclude /out \
	--exclude /fuzz/target --exclude /fuzz/corpus \
	--exclude /fuzz/artifacts --exclude /fuzz/coverage
HOST_CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	$(CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS)
# legal-info copies a local package's tree with $(RSYNC_VCS_EXCLUSIONS)
# only, not the package's exclusions (pkg-generic.mk): add them there.
cloudlet-legal-info host-cloudlet-legal-info: \
	RSYNC_VCS_EXCLUSIONS += $(CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS)

# The crates unpacked by cloudlet-crates replace crates.io, so the build
# (which the cargo infrastructure runs --offline --locked) needs no network.
CLOUDLET_VENDORED = \
	--config 'source.crates-io.replace-with="cloudlet-crates"' \
	--config 'source.cloudlet-crates.directory="$(1)/VENDOR"'

CLOUDLET_BINS = cloudlet-init cloudletd cloudlet
CLOUDLET_CARGO_BUILD_OPTS = \
	$(call CLOUDLET_VENDORED,$(CLOUDLET_CRATES_DIR)) \
	$(foreach b,$(CLOUDLET_BINS),--bin $(b))
HOST_CLOUDLET_CARGO_BUILD_OPTS = \
	$(call CLOUDLET_VENDORED,$(HOST_CLOUDLET_CRATES_DIR)) \
	--bin cloudlet-bundle

# pkg-cargo.mk sets the release profile from Buildroot's options (opt-level
# from BR2_OPTIMIZE_*, LTO only with BR2_ENABLE_LTO, 16 codegen units): put
# back the workspace's [profile.release], which keeps the binaries small.
# Keep in step with Cargo.toml (scripts/check-buildroot-ext compares them).
# The output directory is pinned, as the install steps read from it.
CLOUDLET_CARGO_ENV = \
	CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
	CARGO_PROFILE_RELEASE_LTO=true \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
	CARGO_TARGET_DIR=$(@D)/target
HOST_CLOUDLET_CARGO_ENV = \
	CARGO_TARGET_DIR=$(@D)/target

# With BR2_ENABLE_DEBUG=y the cargo infrastructure drops --release, so cargo
# builds the dev profile into target/<triple>/debug.
CLOUDLET_PROFILE_DIR = $(if $(BR2_ENABLE_DEBUG),debug,release)

# The workspace root is a virtual manifest, which `cargo install` refuses:
# install the three binaries from the build directly.
define CLOUDLET_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 \
		$(@D)/target/$(RUSTC_TARGET_NAME)/$(CLOUDLET_PROFILE_DIR)/cloudlet-init \
		$(TARGET_DIR)/sbin/init
	$(INSTALL) -D -m 0755 \
		$(@D)/target/$(RUSTC_TARGET_NAME)/$(CLOUDLET_PROFILE_DIR)/cloudletd \
		$(TARGET_DIR)/usr/bin/cloudletd
	$(INSTALL) -D -m 0755 \
		$(@D)/target/$(RUSTC_TARGET_NAME)/$(CLOUDLET_PROFILE_DIR)/cloudlet \
		$(TARGET_DIR)/usr/bin/cloudlet
endef

# The host variant is always built --release.
define HOST_CLOUDLET_INSTALL_CMDS
	$(INSTALL) -D -m 0755 $(@D)/target/release/cloudlet-bundle \
		$(HOST_DIR)/bin/cloudlet-bundle
endef

$(eval $(cargo-package))
$(eval $(host-cargo-package))
