include $(sort $(wildcard $(BR2_EXTERNAL_CLOUDLET_PATH)/package/*/*.mk))
