# Makefile: builds kafka_bridge.so with PGXS and runs the pg_regress suite.
# scripts/test is the one command that also starts Kafka and runs the TAP tests.

MODULE_big = kafka_bridge
OBJS = $(patsubst %.c,%.o,$(wildcard src/*.c))

EXTENSION = kafka_bridge
DATA = $(wildcard kafka_bridge--*.sql)

REGRESS = settings status publish decoder send subscribe
REGRESS_OPTS = --temp-config=$(srcdir)/test/regress.conf --temp-instance=./tmp_check
# isolation specs (specs/*.spec): races between sessions
ISOLATION = conflicts
ISOLATION_OPTS = $(REGRESS_OPTS)

PG_CONFIG ?= pg_config

KAFKA_CFLAGS := $(shell pkg-config --cflags rdkafka jansson)
KAFKA_LIBS := $(shell pkg-config --libs rdkafka jansson)

PG_CPPFLAGS = -I$(srcdir)/src $(KAFKA_CFLAGS)
PG_CFLAGS = -Werror -Wall -Wmissing-prototypes
SHLIB_LINK = $(KAFKA_LIBS) -lpthread

EXTRA_CLEAN = tmp_check results regression.diffs regression.out output_iso

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object depends on the shared headers (PGXS tracks no dependencies)
$(OBJS): $(wildcard src/*.h)

# the pg_regress suite, for scripts/test
print-regress:
	@echo $(REGRESS)
print-isolation:
	@echo $(ISOLATION)
.PHONY: print-regress print-isolation
