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
# host-cloudlet: the cloudlet-bundle tool that post-image signs bundles with.
CLOUDLET_DEPENDENCIES = host-cloudlet $(if $(BR2_PACKAGE_BUSYBOX),busybox)
CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude target --exclude out --exclude .git

CLOUDLET_BINS = cloudlet-init cloudletd cloudlet
CLOUDLET_CARGO_BUILD_OPTS = $(foreach b,$(CLOUDLET_BINS),--bin $(b))

# A local package is rsynced, not downloaded, so Buildroot's download-time
# vendoring does not run: vendor the locked dependencies here instead, so that
# the build itself stays --offline like every other cargo package.
define CLOUDLET_VENDOR_CRATES
	cd $(@D) && \
	$(HOST_MAKE_ENV) CARGO_HOME=$(BR_CARGO_HOME) \
		cargo vendor --locked --versioned-dirs vendor > $(@D)/vendor-config.toml && \
	mkdir -p .cargo && mv vendor-config.toml .cargo/config.toml
endef
CLOUDLET_POST_RSYNC_HOOKS += CLOUDLET_VENDOR_CRATES
HOST_CLOUDLET_POST_RSYNC_HOOKS += CLOUDLET_VENDOR_CRATES
HOST_CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = $(CLOUDLET_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS)

HOST_CLOUDLET_CARGO_BUILD_OPTS = --bin cloudlet-bundle

# The workspace root is a virtual manifest, which `cargo install` refuses:
# install the three binaries from the build directly.
define CLOUDLET_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/target/$(RUSTC_TARGET_NAME)/release/cloudlet-init \
		$(TARGET_DIR)/sbin/init
	$(INSTALL) -D -m 0755 $(@D)/target/$(RUSTC_TARGET_NAME)/release/cloudletd \
		$(TARGET_DIR)/usr/bin/cloudletd
	$(INSTALL) -D -m 0755 $(@D)/target/$(RUSTC_TARGET_NAME)/release/cloudlet \
		$(TARGET_DIR)/usr/bin/cloudlet
endef

define HOST_CLOUDLET_INSTALL_CMDS
	$(INSTALL) -D -m 0755 $(@D)/target/release/cloudlet-bundle \
		$(HOST_DIR)/bin/cloudlet-bundle
endef

$(eval $(cargo-package))
$(eval $(host-cargo-package))
