# test/run_tap.pl - run TAP test files and write "PASSED FAILED" (assertion
# counts) to the file named by the first argument, for scripts/test.
# Each file runs on its own, so a file that bails out does not stop the
# others; a file that dies, bails out or runs a different number of tests
# than planned counts as a failure even when no single assertion failed.
use strict;
use warnings;
use TAP::Harness;

my ($counts_file, @files) = @ARGV;
my $harness = TAP::Harness->new({ verbosity => 0, merge => 0, color => 0, timer => 1 });
my ($passed, $failed) = (0, 0);
my @failed_files;

for my $file (@files)
{
	my $agg = eval { $harness->runtests($file) };
	if (!$agg)
	{
		print "$file: $@";
		$failed++;
		push @failed_files, $file;
		next;
	}
	my ($parser) = $agg->parsers($file);
	my $bad = scalar(my @f = $parser->failed);
	$passed += scalar(my @p = $parser->passed);
	$bad = 1 if !$bad && ($parser->exit || $parser->parse_errors);
	$failed += $bad;
	push @failed_files, $file if $bad;
}

open my $fh, '>', $counts_file or die "cannot write $counts_file: $!";
print $fh "$passed $failed\n";
close $fh;

# print the logs of failing files, so a CI log says why
my $logdir = ($ENV{TESTDIR} // '.') . '/tmp_check/log';
for my $file (@failed_files)
{
	(my $name = $file) =~ s{.*/}{};
	$name =~ s{\.pl$}{};
	for my $log (glob("$logdir/regress_log_$name"), glob("$logdir/${name}_*.log"))
	{
		print "\n----- tail of $log -----\n";
		system('tail', '-n', '80', $log);
	}
}
exit($failed ? 1 : 0);
